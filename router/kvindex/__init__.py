"""The router's KV-block index: block keys, the event-fed index, and its ZMQ subscriber."""
