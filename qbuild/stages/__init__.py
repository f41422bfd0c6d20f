"""Build stages: each declares params, tools and upstream; only ``run()`` acts."""
