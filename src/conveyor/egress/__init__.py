"""The egress guard: outbound HTTP only to public destinations, checked when a connection is
made (`transport`), and early where the URL alone tells (`hosts`); the table (`policy`); the
clients (`client`)."""
