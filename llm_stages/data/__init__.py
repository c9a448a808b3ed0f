"""Data: readers per format, rendering, collation, DataModules."""
