"""`secondsite-lab`: the whole pipeline (master target, process server, agent on loop
devices, a churn generator) on this one machine, for the quickstart, tests and benches.

Until the configuration server lands, the lab wires the components with a static
configuration and its own throwaway CA (appliance/lab/pki.py).
"""
