from cluster_engine.cli.main import main

main()
