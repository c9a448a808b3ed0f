"""Measurements (speed, memory). Never asserted in tests; results go in issue notes and bench/results."""
