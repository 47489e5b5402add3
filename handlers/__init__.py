"""Our Ignite event handlers. Each attaches to an Engine on its own and imports only torch and ignite."""
