"""kvlab's router: admission, tenants, routing policies (pure) and, around them, the HTTP proxy."""
