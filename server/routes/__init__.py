"""HTTP routes, one module per area: ``reason`` (the product), ``openai`` (compatible
routes), ``ops`` (health, readiness, metrics). Routes parse and format; the work is in
``server.service``."""
