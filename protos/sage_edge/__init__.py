"""SAGE Edge proto package (``sage_edge.*`` on the wire)."""
