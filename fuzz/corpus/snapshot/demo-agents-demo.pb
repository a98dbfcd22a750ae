
36ad97a01d16ed52agents/democ
demo
http://127.0.0.1:3001/mcp:
authorizationBearer not-a-real-tokendemo-token/token °ê"<
demo-agents-
demoechoaddsleeptest_*test://*"*