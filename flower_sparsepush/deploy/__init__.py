"""The Deployment Engine across machines: the loopback deployment behind ``sparsepush deploy-local``, the long-lived
node worker beside each SuperNode, its executor, and the SuperNode polling patch.

May import everything below it: ``core``, ``learn``, ``run``, ``flower`` and the strategies.
"""
