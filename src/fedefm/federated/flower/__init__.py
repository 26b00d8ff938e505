"""Flower (Message API) apps that run the algorithms of ``federated/algorithms/`` across machines.

``client_app`` is the ClientApp every hospital's SuperNode runs on its own data; ``server_app`` the
ServerApp: a relay that forwards each silo the models its overlay allows and writes the simulator's
run folder. ``messages`` converts between our silo states and Flower records; ``deploy`` starts
SuperLinks, SuperNodes and runs for the ``fedefm flower`` commands. Only this package imports ``flwr``.
"""
