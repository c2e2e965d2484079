"""The streamhps inference server: HTTP over one inference worker plus the dense model.

Start it with ``streamhps serve --config PATH --store DIR``; talk to it with
:class:`streamhps.client.InferenceClient`.
"""
