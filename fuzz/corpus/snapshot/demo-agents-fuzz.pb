
df3154f420e660deagents/fuzzc
demo
http://127.0.0.1:3001/mcp:
authorizationBearer not-a-real-tokendemo-token/token °ê"<
demo-agents-
demoechoaddsleeptest_*test://*"*