"""The benchmark scripts and what they share (runner.py); see README.md beside this file."""
