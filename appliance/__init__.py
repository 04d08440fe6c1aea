"""Secondsite appliance roles and what they share."""
