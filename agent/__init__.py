"""Secondsite source-host agent."""
