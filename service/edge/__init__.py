"""What both doors share: auth roles, request ids and headers, metrics, the protocol-neutral rules."""
