"""Runnable online trainers that publish through :class:`streamhps.Publisher`."""
