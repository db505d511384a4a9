"""The trainer's training code: configuration and profiles, dataset checks, the training
worker (runs in its own process) and the async runner that drives it."""
