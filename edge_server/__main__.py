from edge_server.cli import main

main()
