// The AWS SDK for JavaScript v3 as the hub's owner, configured only by the
// hub's profile files (AWS_CONFIG_FILE with endpoint_url): it signs
// differently from botocore (x-amz-content-sha256, amz-sdk-* headers), so
// it checks the hub's SigV4 against a second SDK family.
// Usage: node owner_sdk.cjs (NODE_PATH: node_modules with @aws-sdk/*).
const assert = require("node:assert/strict");
const iotsdk = require("@aws-sdk/client-iot-data-plane");
const lambdasdk = require("@aws-sdk/client-lambda");
const smsdk = require("@aws-sdk/client-secrets-manager");

const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);

async function expectError(name, promise) {
  try {
    await promise;
  } catch (e) {
    assert.equal(e.name, name, `${e.name}: ${e.message}`);
    return;
  }
  assert.fail(`expected ${name}, the call succeeded`);
}

(async () => {
  const iot = new iotsdk.IoTDataPlaneClient({});
  let r = await iot.send(new iotsdk.UpdateThingShadowCommand({
    thingName: "js-thing", shadowName: "cfg",
    payload: enc(JSON.stringify({ state: { desired: { a: 1 } }, clientToken: "js-1" })),
  }));
  let doc = JSON.parse(dec(r.payload));
  assert.equal(doc.version, 1);
  assert.equal(doc.clientToken, "js-1");
  r = await iot.send(new iotsdk.GetThingShadowCommand({ thingName: "js-thing", shadowName: "cfg" }));
  assert.deepEqual(JSON.parse(dec(r.payload)).state.delta, { a: 1 });
  r = await iot.send(new iotsdk.ListNamedShadowsForThingCommand({ thingName: "js-thing" }));
  assert.deepEqual(r.results, ["cfg"]);
  await expectError("ConflictException", iot.send(new iotsdk.UpdateThingShadowCommand({
    thingName: "js-thing", shadowName: "cfg", payload: enc('{"state":{"reported":{"a":1}},"version":9}'),
  })));
  await expectError("ResourceNotFoundException", iot.send(new iotsdk.GetThingShadowCommand({ thingName: "nope" })));
  await iot.send(new iotsdk.PublishCommand({ topic: "js/a b", qos: 1, payload: enc("hi") }));
  await iot.send(new iotsdk.DeleteThingShadowCommand({ thingName: "js-thing", shadowName: "cfg" }));

  const lambda = new lambdasdk.LambdaClient({});
  r = await lambda.send(new lambdasdk.InvokeCommand({ FunctionName: "echo", Payload: enc('{"js":true}') }));
  assert.equal(r.StatusCode, 200);
  assert.equal(dec(r.Payload), '{"js":true}');
  r = await lambda.send(new lambdasdk.InvokeCommand({ FunctionName: "echo", InvocationType: "Event", Payload: enc("{}") }));
  assert.equal(r.StatusCode, 202);
  await expectError("ResourceNotFoundException", lambda.send(new lambdasdk.InvokeCommand({ FunctionName: "nope" })));

  const sm = new smsdk.SecretsManagerClient({});
  r = await sm.send(new smsdk.GetSecretValueCommand({ SecretId: "db-password" }));
  assert.equal(r.SecretString, process.env.EXPECT_SECRET);
  await expectError("ResourceNotFoundException", sm.send(new smsdk.GetSecretValueCommand({ SecretId: "nope" })));
  console.log("js sdk: all checks passed");
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
