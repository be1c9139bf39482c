from .cli import main

if __name__ == "__main__":  # not when `moedpo plan` spawns its tracing processes
    main()
