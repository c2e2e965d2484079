"""The demo application: the whole system on one machine (``streamhps demo``)."""
