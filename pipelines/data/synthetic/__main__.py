from pipelines.data.synthetic.generate import main

main()
