from litllm.commands import main

main()
