"""Shared building blocks of the AbU scripts: data, models, losses, Fisher, metrics, pictures."""
