"""The appliance's setup service (`secondsite-setupd`, org.secondsite.Setup1).

Network, hostname, time, roles and registration with a configuration server, as the
console's first-boot wizard sets them. `core.SetupCore` holds the methods and never
imports D-Bus; `dbus_service` is the thin front end; `systemd` is the client of
systemd's own D-Bus API that `roles` and `time` drive.
"""
