"""Remote transports, chosen by URL scheme through ``registry``."""
