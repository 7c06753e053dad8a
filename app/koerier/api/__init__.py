"""The Notificaties API over HTTP: Tornado handlers, problem+json errors, validation."""
