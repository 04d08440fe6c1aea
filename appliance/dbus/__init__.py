"""dbus-python glue shared by the appliance's D-Bus services and their clients.

dbus-python has no asyncio integration: `glib` runs GLib's main loop on one thread,
`bridge` hands method calls from it to the asyncio loop and converts records to and
from D-Bus types, `client` is the synchronous caller used by command-line tools.
Core objects never import this package."""
