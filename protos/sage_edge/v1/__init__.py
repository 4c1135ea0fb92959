"""Wire protocol version 1: ``from protos.sage_edge.v1 import edge_pb2, edge_pb2_grpc``."""
