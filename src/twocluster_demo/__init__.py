"""The embedded demo: realistic sample data and `make run`."""
