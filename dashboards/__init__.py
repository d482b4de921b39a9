"""Grafana dashboards kept as code: build.py writes the JSON files, render.py draws them to PNG."""
