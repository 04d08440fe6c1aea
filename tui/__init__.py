"""Secondsite Textual console."""
