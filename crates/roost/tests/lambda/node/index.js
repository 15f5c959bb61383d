// A plain Node.js Lambda handler, run unmodified by the npm runtime client.
exports.handler = async (event, context) => ({
  node: event,
  fn: context.functionName,
  requestId: context.awsRequestId,
});

exports.fail = async () => {
  throw new TypeError("node says no");
};
