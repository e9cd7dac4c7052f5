"""The rule document, pure: bytes in, a validated frozen model and the one meaning of a route out."""
