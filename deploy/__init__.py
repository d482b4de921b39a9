"""Deployment assets; deploy/local is importable as `deploy.local` (engines, scaleout, stack)."""
