"""What every role daemon shares: sd_notify, journald-friendly logging, operator errors."""
