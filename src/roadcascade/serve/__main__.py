from ..cli.serve import main

main()
