"""Hardware and model catalogs and the roofline: the one place durations come from. Pure."""
