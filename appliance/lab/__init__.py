"""`secondsite-lab`: the whole pipeline (configuration server on a private D-Bus, master
target, process server, agent on loop devices, a churn generator) on this one machine,
for the quickstart, tests and benches. Every component enrols with the configuration
server's passphrase, as on real sites.
"""
