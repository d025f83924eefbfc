from mmlab_cli.main import main

main()
