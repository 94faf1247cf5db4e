"""Thin FastAPI routers: parse the request, call service.domain, shape the response."""
