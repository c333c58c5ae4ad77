from cluster_engine.cli import main

main()
