"""Contracts at the bottom of the package: types, errors and the handles every role imports."""
