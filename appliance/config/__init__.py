"""The configuration server: inventory, CA and enrolment, health, jobs (`secondsite-configd`).

Core modules never import D-Bus; `appliance.config.dbus_service` translates."""
