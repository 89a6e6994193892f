from studio.cli import main

if __name__ == "__main__":  # importing this module must not start the app
    raise SystemExit(main())
