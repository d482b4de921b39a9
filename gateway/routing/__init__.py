"""Plan stage: which model and deployment serve a request, in which fallback order, and why."""
