from mmlab_cli.main import main

if __name__ == "__main__":  # a spawned sweep worker imports this module as __mp_main__: it must not run the CLI
    main()
