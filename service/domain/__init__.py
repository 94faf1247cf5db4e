"""Domain logic in one place, independent of HTTP: registration, deletion requests, jobs.

Functions take a session factory (and storage/settings where needed) and raise
`service.errors.DomainError` subclasses for anything the caller did wrong (the API edge maps
them to problem+json), so the API routers stay thin and the same rules apply to the CLI and
to tests that call these functions directly.
"""
