"""Measurements (speed, memory). Never asserted in tests; results go in bench/results and bench/README.md."""
