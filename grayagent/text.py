"""Checks on text read from outside (store keys and pointers, ports, proxy answers) that every layer shares."""

from __future__ import annotations


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() alone also takes '²' and other digits that int() refuses."""
    return text.isascii() and text.isdigit()
