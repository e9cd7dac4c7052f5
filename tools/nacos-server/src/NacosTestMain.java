/*
 * Starts a standalone Nacos 3.x server from a plain classpath (tests and CI only).
 *
 * Nacos 3.x starts in phases: a core context (no web), then the server web context
 * (main port, context path /nacos) and the console context (nacos.console.port), both
 * children of the core context. The upstream distribution does this in its `bootstrap`
 * module, which is not published on Maven Central, so this file does the same.
 *
 * -Dnacos.deployment.type=merged (default) or server (no console context).
 */

import com.alibaba.nacos.NacosServerBasicApplication;
import com.alibaba.nacos.NacosServerWebApplication;
import com.alibaba.nacos.console.NacosConsole;
import com.alibaba.nacos.core.listener.startup.NacosStartUp;
import com.alibaba.nacos.core.listener.startup.NacosStartUpManager;
import com.alibaba.nacos.sys.env.Constants;
import com.alibaba.nacos.sys.env.DeploymentType;
import com.alibaba.nacos.sys.env.EnvUtil;
import org.springframework.boot.Banner;
import org.springframework.boot.WebApplicationType;
import org.springframework.boot.builder.SpringApplicationBuilder;
import org.springframework.context.ConfigurableApplicationContext;

public final class NacosTestMain {

    private NacosTestMain() {
    }

    public static void main(String[] args) {
        String type = System.getProperty(Constants.NACOS_DEPLOYMENT_TYPE, Constants.NACOS_DEPLOYMENT_TYPE_MERGED);
        DeploymentType deploymentType = DeploymentType.getType(type);
        if (deploymentType != DeploymentType.MERGED && deploymentType != DeploymentType.SERVER) {
            throw new IllegalArgumentException("unsupported nacos.deployment.type " + type);
        }
        // console beans are @ConditionalOnProperty(nacos.deployment.type=merged): make it explicit
        System.setProperty(Constants.NACOS_DEPLOYMENT_TYPE, deploymentType.getTypeName());
        EnvUtil.setDeploymentType(deploymentType);

        NacosStartUpManager.start(NacosStartUp.CORE_START_UP_PHASE);
        ConfigurableApplicationContext core = new SpringApplicationBuilder(NacosServerBasicApplication.class)
                .web(WebApplicationType.NONE).bannerMode(Banner.Mode.OFF).run(args);

        NacosStartUpManager.start(NacosStartUp.WEB_START_UP_PHASE);
        new SpringApplicationBuilder(NacosServerWebApplication.class).parent(core)
                .bannerMode(Banner.Mode.OFF).run(args);

        if (deploymentType == DeploymentType.MERGED) {
            NacosStartUpManager.start(NacosStartUp.CONSOLE_START_UP_PHASE);
            new SpringApplicationBuilder(NacosConsole.class).parent(core)
                    .bannerMode(Banner.Mode.OFF).run(args);
        }
        System.out.println("grayagent-nacos-ready");
    }
}
